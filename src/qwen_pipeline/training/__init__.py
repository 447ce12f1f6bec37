"""Training: the recipe (``recipe.py``) and, later, its launcher."""
