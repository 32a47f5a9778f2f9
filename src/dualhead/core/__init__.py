"""The application-free multi-task core: tasks, the model protocol, the registry, the Trainer.

Nothing here imports an application (`dualhead.vqa`, `dualhead.dense`); applications plug in through
`Experiment` and the ``dualhead.applications`` entry points (see `dualhead.core.applications`).
"""
