"""Whole jobs, one module each: a settings dataclass in, a result out (printing is the CLI's).

train, evaluate, generate, merge, export, verify, info, demo. Recipes import everything below them
(io, training, core, methods, data); nothing below imports a recipe.
"""
