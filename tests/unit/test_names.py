"""Names become path components, state-file names and unit names: only a small ASCII set passes."""

from __future__ import annotations

import pytest

from gestvenv import InvalidNameError, ValidationError
from gestvenv.names import MAX_NAME_LENGTH, generate_name, validate_name, validate_packages


@pytest.mark.parametrize("name", [
    "test-env",
    "ci_test.1",
    "a",
    "0",
    "A1-b_2.c",
    "x" * MAX_NAME_LENGTH,
])
def test_valid_names_are_returned_unchanged(name: str) -> None:
    assert validate_name(name) == name


def test_max_length_is_64() -> None:
    assert MAX_NAME_LENGTH == 64
    assert validate_name("n" * 64) == "n" * 64
    with pytest.raises(InvalidNameError, match="65 characters"):
        validate_name("n" * 65)


@pytest.mark.parametrize("name", [
    "",
    "../x",
    "..",
    ".",
    "a;b",
    "a/b",
    "a b",
    "a$b",
    "a:b",
    "a\\b",
    "a*",
    ".hidden",
    "-x",
    "_x",
    "a..b",
    "trailing.",
    "t\u00ebst",         # a Latin-1 letter
    "test\u200b",        # zero-width space
    "\uff54\uff45\uff53\uff54",  # fullwidth "test"
    "\u0442est",         # Cyrillic "t"
    "\u0661\u0662",      # Arabic-Indic digits (str.isdigit() says True)
    "abc\n",
    "\nabc",
    "abc\x00",
    "ab\tc",
])
def test_invalid_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_name(name)


@pytest.mark.parametrize("value", [None, 123, b"test-env", ["test-env"], 1.5])
def test_non_string_names_are_rejected(value: object) -> None:
    with pytest.raises(InvalidNameError, match="must be a string"):
        validate_name(value)


def test_invalid_name_error_is_a_validation_error_and_value_error() -> None:
    with pytest.raises(ValidationError):
        validate_name("a/b")
    with pytest.raises(ValueError, match="invalid environment name"):
        validate_name("a/b")


def test_generated_names_are_valid_and_distinct() -> None:
    names = {generate_name() for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert validate_name(name) == name


# --- package specs ---

@pytest.mark.parametrize("specs", [
    ["six>=1.0"],
    ["six>=1.0", "requests==2.32.0", "gvdemo[extra] ; python_version >= '3'"],
    ["./some/local/path", "https://example.invalid/x.whl"],
    [" six "],
])
def test_specs_pass_through_untouched(specs: list[str]) -> None:
    out = validate_packages(specs)
    assert out == tuple(specs)
    for given, kept in zip(specs, out, strict=True):
        assert kept is given


def test_none_and_empty_mean_no_packages() -> None:
    assert validate_packages(None) == ()
    assert validate_packages([]) == ()


def test_any_iterable_of_specs_is_accepted() -> None:
    assert validate_packages(s for s in ("six", "gvdemo")) == ("six", "gvdemo")


def test_a_bare_string_is_refused_with_a_hint() -> None:
    with pytest.raises(ValidationError, match=r"\['six'\]"):
        validate_packages("six")


@pytest.mark.parametrize("spec", [
    "",
    "   ",
    "--index-url=x",
    "-e.",
    " --extra-index-url=http://x",
    "a\nb",
    "a\rb",
    "a\x00b",
])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValidationError):
        validate_packages(["six", spec])


def test_non_string_spec_is_refused() -> None:
    with pytest.raises(ValidationError, match="must be a string"):
        validate_packages(["six", 3])  # type: ignore[list-item]


def test_a_name_whose_units_are_gestvenvs_own_is_reserved() -> None:
    """An env "cleanup" would be gestvenv-cleanup.service: the cleanup timer's own service."""
    with pytest.raises(InvalidNameError, match="reserved"):
        validate_name("cleanup")
    assert validate_name("cleanup-2") == "cleanup-2"
