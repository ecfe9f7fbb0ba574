"""Container isolation: the engine (Podman or Docker), the env's container as command lines,
and the images gestvenv generates locally (no registry)."""
