"""The schemas of the ``dirfast`` ops: defined here once.

This file is plain Python with no imports on purpose: ``setup.py`` reads it to generate
the C++ header that registers the same schemas with ``TORCH_LIBRARY`` in ``dirfast._C`` (and
numbers the padding modes), and :mod:`dirfast.ops` defines them from Python when the
extension is not built.
"""

NAMESPACE = "dirfast"

# The padding modes of smooth_bins; a mode's number (its index here) is what the C++ and CUDA
# kernels (enum dirfast::Padding, generated from this tuple) and the Triton kernel receive.
PADDINGS = ("reflect", "replicate", "constant", "symmetric")

SCHEMAS = {
    "bin_stats": "bin_stats(Tensor x, Tensor bin_idx, int num_bins) -> (Tensor, Tensor, Tensor)",
    "smooth_bins": "smooth_bins(Tensor stats, Tensor window, str padding=\"reflect\") -> Tensor",
    "calibrate": (
        "calibrate(Tensor x, Tensor bin_idx, Tensor m1, Tensor v1, Tensor m2, Tensor v2, "
        "float clip_min=0.1, float clip_max=10.0) -> Tensor"
    ),
    # calibrate written into x: FDS.smooth calibrates the features in place.
    "calibrate_": (
        "calibrate_(Tensor(a!) x, Tensor bin_idx, Tensor m1, Tensor v1, Tensor m2, Tensor v2, "
        "float clip_min=0.1, float clip_max=10.0) -> ()"
    ),
}
