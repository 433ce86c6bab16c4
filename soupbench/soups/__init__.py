"""Soup methods, one file each. A method is a plain function `build(ctx, **settings) -> SoupResult`, selected by
its config's `_target_` under `conf/soup/`, and declares in its own file its settings and traits
(`DECLARATIONS`: name -> context.Declaration); conf/soup/<name>.yaml repeats them with comments.

- best_individual.py  the ingredient with the best held-out accuracy
- uniform.py          mean of all ingredients
- greedy.py           greedy soup (held-out order, keep an ingredient if held-out accuracy does not drop)
- learned/            learned, learned+, HL-Soup(+), MEHL-Soup(+): one coefficient-learning engine
- ensemble.py         output ensemble and greedy ensemble (K forward passes at inference)
- wise_ft.py          WiSE-FT: interpolation of the start and the best ingredient (or an earlier soup)
- model_stock.py      Model Stock: the average pulled towards the start by the task vectors' angle

Shared by the methods:

- context.py          SoupContext (what a method is given), SoupResult (what it returns), Declaration
- registry.py         which methods there are: by name or `_target_`, their settings and traits
- engine.py           build and finish a soup (the command and soupbench.soup() both call it)
- averaging.py        streamed weighted averaging of ingredients (two state dicts in memory at most)
"""
