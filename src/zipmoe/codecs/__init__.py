"""Codecs: BF16 bit planes, exponent coders (rANS, zstd, lz4), chunk checksums, encoded tensor parts."""
