"""The eager-inference shortcut (fastlm/ops/_impl.py eager_inference): in eager mode without gradients,
the public ops call their kernel directly instead of through their torch.library op. The result must
be the op's, bit for bit; meta tensors must still get shapes (torch's meta kernels under "auto", the
ops' fake implementations under a forced kernel backend); a call that needs gradients must go
through the op (autograd)."""
import torch

import fastlm
from fastlm import ops


def _kernel_backend() -> str:
    """The C++ backend where built (the shortcut is about the kernels), else the reference."""
    return "cpu" if "cpu" in fastlm.available_backends("linear", "cpu") else "reference"


def _calls():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g)
    w1, w2 = torch.randn(24, 16, generator=g), torch.randn(16, 24, generator=g)
    b1, b2 = torch.randn(24, generator=g), torch.randn(16, generator=g)
    q = torch.randn(1, 2, 9, 16, generator=g)
    return {
        "linear": (lambda x, w, b: ops.linear(x, w, b), (x, w1, b1)),
        "layer_norm": (lambda x, w, b: ops.layer_norm(x, (16,), w, b), (x, b2, b2)),
        "add_layer_norm": (lambda x, r: ops.add_layer_norm(x, r, (16,))[0], (x, x.flip(0))),
        "linear_gelu": (lambda x, w, b: ops.linear_gelu(x, w, b, "tanh"), (x, w1, b1)),
        "gelu_ffn": (lambda x, w1, b1, w2, b2: ops.gelu_ffn(x, w1, b1, w2, b2, "none"), (x, w1, b1, w2, b2)),
        "attention": (lambda q: ops.scaled_dot_product_attention(q, q, q, is_causal=True), (q,)),
    }


def test_direct_path_equals_the_op_path():
    for name, (fn, args) in _calls().items():
        with torch.no_grad(), fastlm.use_backend(_kernel_backend()):
            direct = fn(*args)
        leaves = [a.clone().requires_grad_() for a in args]
        with fastlm.use_backend(_kernel_backend()):
            through_op = fn(*leaves)                   # needs gradients: the custom op (and autograd)
        assert through_op.grad_fn is not None, name
        assert torch.equal(direct, through_op.detach()), name


def test_meta_tensors_reach_the_fake_implementations():
    for name, (fn, args) in _calls().items():
        real = fn(*args)
        meta = fn(*[a.to("meta") for a in args])
        assert meta.device.type == "meta" and meta.shape == real.shape and meta.dtype == real.dtype, name
        with fastlm.use_backend(_kernel_backend()):
            meta = fn(*[a.to("meta") for a in args])
        assert meta.device.type == "meta" and meta.shape == real.shape and meta.dtype == real.dtype, name
