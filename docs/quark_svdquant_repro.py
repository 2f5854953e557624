"""Minimal reproduction of AMD Quark 0.13 SVDQuantProcessor bugs (torch + quark only, CPU, seconds).

1. Smoothing without the matching un-smoothing: `ActivationSmoother.compute_smooth_factors` + `apply_smoothing`
   scale W by s for every Linear not matched by `exclude_patterns`, but the 1/s fold happens only in the
   SVD loop, for layers passing `_should_quantize` (min(out, in) >= min_layer_size). Any narrower Linear
   keeps W*s: the float model's output changes before any quantization.
2. The default `exclude_patterns` ("time_embedding", ...) are bare names matched with fnmatch against
   dotted module names, so they never match e.g. "time_embedding.linear_1".
3. A float32 model's residual and low-rank weights are stored as bfloat16
   (`if orig_dtype == torch.float32: orig_dtype = torch.bfloat16`), then the forward fails with mixed dtypes.
"""
import copy
import fnmatch

import torch
from quark.torch.algorithm.svdquant import SVDQuantProcessor
from quark.torch.quantization.config.config import SVDQuantConfig

torch.manual_seed(0)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.time_embedding = torch.nn.Sequential(torch.nn.Linear(64, 64))
        self.wide = torch.nn.Linear(64, 512)
        self.narrow = torch.nn.Linear(512, 64)

    def forward(self, x):
        return self.narrow(torch.relu(self.wide(self.time_embedding(x))))


data = [torch.randn(16, 64) * torch.linspace(0.1, 10, 64) for _ in range(4)]  # uneven channel ranges
net = Net().eval()
with torch.no_grad():
    ref = torch.cat([net(x) for x in data])

print("2. Linears the default exclude patterns match:", [n for n, layer in net.named_modules() if isinstance(
    layer, torch.nn.Linear) and any(fnmatch.fnmatch(n, p) for p in SVDQuantConfig().exclude_patterns)])

# 1. no layer is >= 256 in both dimensions: nothing is decomposed, everything is smoothed
m = copy.deepcopy(net)
SVDQuantProcessor(m, SVDQuantConfig(search_alpha=False), data).apply()
with torch.no_grad():
    out = torch.cat([m(x) for x in data])
print("1. float output rel. error after SVDQuantProcessor.apply (no quantizer at all): %.3g"
      % float((out - ref).norm() / ref.norm()))

# 3. decompose every layer: float32 model -> bfloat16 weights -> dtype error in forward
m = copy.deepcopy(net)
SVDQuantProcessor(m, SVDQuantConfig(search_alpha=False, min_layer_size=0), data).apply()
print("3. residual weight dtype:", m.wide.layer.weight.dtype)
try:
    with torch.no_grad():
        m(data[0])
except RuntimeError as error:
    print("3. forward fails:", str(error).splitlines()[0])
