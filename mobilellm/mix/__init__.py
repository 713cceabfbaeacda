"""Simulation-driven data mixing (SDM): a proxy run's gradient alignments with a target become domain weights.

    from mobilellm.mix import MixConfig, Target, simulate
    summary = simulate(proxy_recipe, Target(domains=("math",)), "runs/mix", config=MixConfig(checkpoints=4))
    main = main_recipe.replace(domain_weights="runs/mix/mix.json")     # or: mobilellm pretrain --mix runs/mix/mix.json
"""

from .influence import alignments, cosine, mean_gradient
from .junk import shuffle_documents, with_junk_domain
from .mixfile import MIX_FILE, read_mix
from .simulate import MixConfig, MixStage, natural_weights, simulate
from .target import Target
from .weights import MixMapping, aggregate, clip_to_bounds, standardize

__all__ = ["MIX_FILE", "MixConfig", "MixStage", "MixMapping", "Target", "aggregate", "alignments", "clip_to_bounds", "cosine",
           "mean_gradient", "natural_weights", "read_mix", "shuffle_documents", "simulate", "standardize",
           "with_junk_domain"]
