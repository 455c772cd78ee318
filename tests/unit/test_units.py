"""mesh.units: sizes as people write them."""

import pytest

from mesh.units import format_size, parse_size

GiB = 1 << 30


@pytest.mark.parametrize("text, want", [
    ("123", 123),
    ("0", 0),
    ("123B", 123),
    ("10GiB", 10 * GiB),
    ("10gib", 10 * GiB),
    ("10Gi", 10 * GiB),
    ("512MiB", 512 << 20),
    ("512 MiB", 512 << 20),
    ("4KiB", 4096),
    ("1.5TiB", int(1.5 * (1 << 40))),
    ("40G", 40 * 10**9),
    ("40GB", 40 * 10**9),
    ("40gb", 40 * 10**9),
    ("1k", 1000),
    ("2M", 2 * 10**6),
    ("1T", 10**12),
    ("1PiB", 1 << 50),
    (".5GiB", GiB // 2),
    (" 8GiB ", 8 * GiB),
    (7, 7),
])
def test_parse_size(text, want):
    assert parse_size(text) == want


def test_parse_size_rounds_fractions_to_the_nearest_byte():
    assert parse_size("1.5") == 2
    assert parse_size("0.3KiB") == 307


@pytest.mark.parametrize("text", ["", "abc", "10XB", "GiB", "10 GiB extra", "1..5G", "10iB",
                                  "-1", "-10GiB", -5, None, "1e9", True])
def test_parse_size_refuses_garbage_naming_allowed_forms(text):
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert "GiB" in str(info.value) and "MB" in str(info.value)


def test_negative_sizes_say_so():
    with pytest.raises(ValueError, match="negative"):
        parse_size("-10GiB")


@pytest.mark.parametrize("n, want", [
    (0, "0B"),
    (123, "123B"),
    (1023, "1023B"),
    (1024, "1KiB"),
    (10 * GiB, "10GiB"),
    (int(9.5 * GiB), "9.5GiB"),
    (512 << 20, "512MiB"),
    (80 * GiB, "80GiB"),
    (40 * 10**9, "37.3GiB"),
    (int(1.5 * (1 << 40)), "1.5TiB"),
    (GiB - 1, "1GiB"),
    (-2 * GiB, "-2GiB"),
])
def test_format_size(n, want):
    assert format_size(n) == want


@pytest.mark.parametrize("n", [1, 1024, 10 * GiB, 3 << 40, 512 << 20])
def test_round_trip_of_exact_binary_sizes(n):
    assert parse_size(format_size(n)) == n
