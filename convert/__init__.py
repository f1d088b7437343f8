"""PyTorch-side tools: the HICCAP reference implementation and weight conversion."""
