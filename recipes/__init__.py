"""Training recipes as code: each is a function returning a typed `mobilellm.train.recipe.Recipe`."""

from .pro_1b import pro_1b, pro_1b_sdm
from .sdm import starter_sdm
from .starter import starter

RECIPES = {"starter": starter, "pro-1b": pro_1b}
SDM_STAGES = {"starter": starter_sdm, "pro-1b": pro_1b_sdm}  # each recipe's data-mixing stage (`mobilellm mix`)


def get_recipe(name: str):
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]()


def get_sdm_stage(name: str):
    if name not in SDM_STAGES:
        raise ValueError(f"no data-mixing stage for recipe {name!r}; known: {', '.join(SDM_STAGES)}")
    return SDM_STAGES[name]()
