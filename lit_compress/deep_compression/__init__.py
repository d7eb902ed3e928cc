"""Deep Compression (Han, Mao & Dally, ICLR 2016): weight sharing, relative-index sparse storage, Huffman.

- :mod:`~lit_compress.deep_compression.huffman`: canonical Huffman coding of integer streams.
- :mod:`~lit_compress.deep_compression.relative_index`: relative positions in ``b`` bits with filler entries.
- :mod:`~lit_compress.deep_compression.codec`: the ``deep-compression`` zoo codec and its per-stream report.
- :mod:`~lit_compress.deep_compression.weight_sharing`: 1-D k-means and the cluster layout (shared gradients).
- :mod:`~lit_compress.deep_compression.sharing_callback`: ``WeightSharing``, trained quantization as a
  Lightning callback that composes after ``Pruning`` in one fit (imports Lightning, so it loads on first use).
"""

from lit_compress.deep_compression.codec import DeepCompressionCodec, read_header, stream_report
from lit_compress.deep_compression.huffman import huffman_decode, huffman_encode, huffman_nbytes
from lit_compress.deep_compression.relative_index import (
    RelativeIndex,
    best_index_bits,
    decode_positions,
    encode_positions,
)
from lit_compress.deep_compression.weight_sharing import (
    ClusterLayout,
    KMeansResult,
    assign,
    cluster_sums,
    init_centroids,
    kmeans_1d,
)

__all__ = [
    "ClusterLayout",
    "DeepCompressionCodec",
    "KMeansResult",
    "RelativeIndex",
    "WeightSharing",
    "assign",
    "best_index_bits",
    "cluster_sums",
    "decode_positions",
    "encode_positions",
    "huffman_decode",
    "huffman_encode",
    "huffman_nbytes",
    "init_centroids",
    "kmeans_1d",
    "read_header",
    "stream_report",
]


def __getattr__(name: str):
    if name == "WeightSharing":  # the callback imports Lightning; the codec (loaded by the zoo) does not
        from lit_compress.deep_compression.sharing_callback import WeightSharing

        return WeightSharing
    raise AttributeError(f"module 'lit_compress.deep_compression' has no attribute {name!r}")
