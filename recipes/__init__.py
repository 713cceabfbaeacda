"""Training recipes as code: each is a function returning a typed `mobilellm.train.recipe.Recipe`."""

from .pro_1b import pro_1b
from .starter import starter

RECIPES = {"starter": starter, "pro-1b": pro_1b}


def get_recipe(name: str):
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]()
