"""The LLM layer: generation backends and prompts. Each backend takes its own settings, never a command's config,
so nothing here imports a command."""
