"""gestvenv's REST API: ``gestvenv serve`` (:mod:`.server`), its client (:mod:`.client`,
``gestvenv.connect``) and the rules both follow (:mod:`.protocol`). The library stays the one
implementation: the server is a shell over it, as the CLI is. See docs/api/rest.md.
"""
