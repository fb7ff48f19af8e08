"""Tests for clsvit.errors.quote_error: how a one-line refusal quotes the error behind it (an image
that cannot be decoded, a parquet shard or folder index that cannot be read, a hub that cannot be
reached)."""

import pyarrow as pa

from clsvit.errors import InputError, quote_error


def test_an_error_is_quoted_by_its_type_and_first_line_at_most_200_characters():
    assert quote_error(OSError("x" * 200 + "y\nsecond line")) == "OSError: " + "x" * 200
    assert quote_error(ValueError("  short\n\n more")) == "ValueError: short"
    assert quote_error(pa.ArrowInvalid("disk gone\nat sector 7")) == "ArrowInvalid: disk gone"
    # an OSError built from errno reads as the C library's message, the file last
    assert quote_error(FileNotFoundError(2, "No such file or directory", "a.parquet")) == (
        "FileNotFoundError: [Errno 2] No such file or directory: 'a.parquet'")
    assert quote_error(InputError("data.path 'x' does not exist")) == "InputError: data.path 'x' does not exist"


def test_an_error_that_says_nothing_is_quoted_by_its_type():
    assert quote_error(OSError()) == "OSError"
    assert quote_error(SyntaxError("  \n ")) == "SyntaxError"
    assert quote_error(pa.ArrowInvalid("  \n")) == "ArrowInvalid"
    assert quote_error(KeyError()) == "KeyError"
