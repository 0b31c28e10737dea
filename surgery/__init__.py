"""surgery: turn a dense Llama-family checkpoint into a sparse mixture-of-experts model.

Data flow (and module order): checkpoint -> profile -> cluster/factorize -> router -> calibrate -> moe/modeling
-> evals -> export. `surgery.load(path)` returns a ready torch model for a dense folder, a .gguf file, a
converted (native) folder or an exported Mixtral / Qwen2-MoE folder.
"""

__version__ = "0.1.0"


def load(path, dtype=None, device="cpu"):
    """Load any model surgery understands; see surgery.modeling.load_model."""
    from surgery.modeling import load_model

    return load_model(path, dtype=dtype, device=device)
