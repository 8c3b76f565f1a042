"""Model file discovery and weight loading (GGUF, safetensors). Never unpickles anything."""
