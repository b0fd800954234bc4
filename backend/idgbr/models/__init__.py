"""Neural networks of IDGBR: the coarse segmenter, the conditional guidance net and the denoiser."""
