"""The stages of a run, one module each, in run order: setup (the objects every stage reads), start (θ0),
finetune or imports (the ingredients), select, soup, evaluate, report. Each takes the set-up and its inputs
and returns its outputs; soupbench.pipeline.run calls them top to bottom."""
