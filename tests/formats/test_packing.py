import pytest
import torch

from diffquant.formats.packing import pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 11, 16])
@pytest.mark.parametrize("n", [1, 7, 1000, 4097])
def test_round_trip_is_exact_and_dense(bits, n):
    codes = torch.randint(0, 1 << bits, (n,))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n).long(), codes)


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([0, 8]), 3)


def test_truncated_stream_is_reported():
    packed = pack_bits(torch.randint(0, 8, (100,)), 3)
    with pytest.raises(ValueError, match="truncated"):
        unpack_bits(packed[:-5], 3, 100)
