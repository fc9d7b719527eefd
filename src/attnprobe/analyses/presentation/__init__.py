"""Presentation: figures (pure functions of tables), one style, the self-contained report."""
