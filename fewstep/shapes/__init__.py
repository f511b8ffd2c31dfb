"""Synthetic scenes for fewstep's built-in text-to-image model (see docs/shapes.md).

`render` draws one or two flat-coloured shapes on a flat background from a seed, `caption` writes
and parses the compositional caption grammar, and `evaluate` parses an image back into objects to
score a prompt.
"""
