"""Graph side of SpeLER: kNN graph (``speler.graph.knn``), balanced propagation, energy and
reliability (``speler.graph.propagate``), eigenvalue spectrum of the operator
(``speler.graph.spectrum``). Import from the submodules; nothing is re-exported here, so that
``speler.graph.propagate`` always names the module, not the function."""
