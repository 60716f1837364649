"""fastlm's Triton kernels and their launchers (installed as fastlm.kernels): tensors in, tensors out,
no autograd, no backend policy. One module per op family; importing one imports triton."""
