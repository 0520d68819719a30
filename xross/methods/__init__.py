"""xross.methods: The training methods: their objectives (Independent, KD, DML, XML), the cohort trainer, MutualNet and
MEAL V2 distillation with its discriminator, each registered once in the method table. May import
``xross.run`` and everything below it.
"""
