"""Time and memory of attention blocks and networks over growing feature maps (``nlsr bench``).

* :mod:`nlsr.bench.measuring`: one callable's times and peak memory (how they are taken is
  described there), the scaling-exponent fit and extrapolation, the device and environment;
* :mod:`nlsr.bench.inputs`: what the targets are fed (an image's crops and features, the
  features inside each block's network, or random tensors) and the sparsemax supports HSPA
  blocks meet on it;
* :mod:`nlsr.bench.suite`: what is measured (blocks, networks with their attention swapped, the
  released baselines of :mod:`nlsr.attention.reference`), at which sizes, and the fits;
* :mod:`nlsr.bench.reporting`: the report's rows, settings and fits, its tables, JSON and plot.
"""
