"""SD3 / SD3.5 and Flux transformers on rectified-flow schedules: the `recipe.family.Family` adapter and its parts."""
