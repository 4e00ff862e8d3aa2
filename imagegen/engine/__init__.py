"""The generation engine: the only code that imports torch and diffusers at module level."""
