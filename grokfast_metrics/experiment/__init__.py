"""The paper's experiment: tasks, models (``model``, ``transformer``), Grokfast filters, complexity measures, the
trainer (``trainer``, ``trainctl``, ``asyncrows``, ``collapse``), its configuration (``config``), the run directory
(``runlog``, ``checkpoint``)."""
