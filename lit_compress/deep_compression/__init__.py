"""Deep Compression (Han, Mao & Dally, ICLR 2016): weight sharing, relative-index sparse storage, Huffman.

- :mod:`~lit_compress.deep_compression.huffman`: canonical Huffman coding of integer streams.
- :mod:`~lit_compress.deep_compression.relative_index`: relative positions in ``b`` bits with filler entries.
- :mod:`~lit_compress.deep_compression.codec`: the ``deep-compression`` zoo codec and its per-stream report.
"""

from lit_compress.deep_compression.codec import DeepCompressionCodec, read_header, stream_report
from lit_compress.deep_compression.huffman import huffman_decode, huffman_encode, huffman_nbytes
from lit_compress.deep_compression.relative_index import (
    RelativeIndex,
    best_index_bits,
    decode_positions,
    encode_positions,
)

__all__ = [
    "DeepCompressionCodec",
    "RelativeIndex",
    "best_index_bits",
    "decode_positions",
    "encode_positions",
    "huffman_decode",
    "huffman_encode",
    "huffman_nbytes",
    "read_header",
    "stream_report",
]
