"""Does SEMA help? A small, reproducible study on data shipped with packages (issue 8).

E1 (:mod:`.digits`): scikit-learn's ``load_digits``, an MLP, SGD; a grid over learning rate and
EMA decay. E2 (:mod:`.charlm`): a character-level GRU on Python standard-library source. Both
compare three arms through ``sema.SwitchEMA`` (:mod:`.arms`): plain, EMA (evaluated in
``swapped()``), SEMA (switch every epoch). Rerun everything with ``python -m bench.effectiveness``.
"""
