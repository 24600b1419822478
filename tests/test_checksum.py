"""XXH64: the kernel equals the xxhash library and the pure-Python twin, at any offset and length."""

import os

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from zipmoe.codecs import reference
from zipmoe.codecs.checksum import checksum, to_hex, xxh64


def test_known_vectors():
    assert checksum(b"") == 0xEF46DB3751D8E999
    assert checksum(b"a") == 0xD24EC4F1A98C6E5B
    assert to_hex(checksum(b"")) == "ef46db3751d8e999"


@pytest.mark.parametrize("length", list(range(0, 72)) + [1000, 4096, 4097, 65537])
def test_matches_xxhash_and_reference(length):
    data = os.urandom(length)
    expected = xxhash.xxh64_intdigest(data)
    assert checksum(data) == expected
    assert reference.xxh64(data) == expected


@given(st.binary(max_size=300), st.integers(0, 7))
def test_any_offset(data, offset):
    buf = np.frombuffer(bytes(offset) + data + b"\xff" * 3, np.uint8)
    assert int(xxh64(buf, offset, offset + len(data))) == xxhash.xxh64_intdigest(data)
