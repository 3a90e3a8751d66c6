"""Recipes: what trains, above the model it trains. Each reads top to bottom (set up, train, save);
``medvlm/model`` only assembles the modules they train, and ``medvlm/build.py`` resolves what a config
names (a built-in model, the public start, a run folder) by asking a recipe to build it once."""
