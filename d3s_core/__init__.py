"""D3S maths: pure PyTorch, tensors in and tensors out.

No file I/O, no Prefect, no printing. Paper references are to Loo, Maalouf et al.,
"Large Scale Dataset Distillation with Domain Shift" (ICML 2024).
"""
