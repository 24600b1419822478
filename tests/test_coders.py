"""The exponent coder registry and contract."""

import pytest

from zipmoe.codecs.coders import (
    Lz4Coder,
    Lz4HcCoder,
    RansCoder,
    ZstdCoder,
    coder_from_config,
    known_coders,
    parse_coder,
)
from zipmoe.errors import UnknownCodecError


def test_registry():
    assert known_coders() == ["lz4", "lz4hc", "rans", "zstd"]


@pytest.mark.parametrize(
    "spec, cls, config",
    [
        ("rans", RansCoder, {"id": "rans", "lanes": 8, "precision_bits": 10}),
        ("zstd", ZstdCoder, {"id": "zstd", "level": 3}),
        ("zstd:19", ZstdCoder, {"id": "zstd", "level": 19}),
        ("lz4", Lz4Coder, {"id": "lz4"}),
        ("lz4hc", Lz4HcCoder, {"id": "lz4hc", "level": 9}),
        ("lz4hc:12", Lz4HcCoder, {"id": "lz4hc", "level": 12}),
    ],
)
def test_specs_and_config_roundtrip(spec, cls, config):
    coder = parse_coder(spec)
    assert type(coder) is cls
    assert coder.get_config() == config
    assert coder_from_config(config) == coder


@pytest.mark.parametrize(
    "spec, message",
    [
        ("brotli", "unknown exponent coder 'brotli'"),
        ("zstd:99", "level 99 is outside 1..22"),
        ("zstd:x", "the level must be an integer"),
        ("lz4:3", "takes no level"),
        ("rans:3", "takes no level"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(UnknownCodecError, match=message):
        parse_coder(spec)


def test_unreadable_configs():
    with pytest.raises(UnknownCodecError, match="unsupported parameters"):
        coder_from_config({"id": "rans", "lanes": 4, "precision_bits": 10})
    with pytest.raises(UnknownCodecError, match="unknown parameters"):
        coder_from_config({"id": "zstd", "level": 3, "dict": 1})
    with pytest.raises(UnknownCodecError, match="must be an object"):
        coder_from_config("rans")
