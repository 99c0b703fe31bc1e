"""Models: loading (bundled GGUF SLMs, Hugging Face ids, local paths), the adapter table, prompts."""
