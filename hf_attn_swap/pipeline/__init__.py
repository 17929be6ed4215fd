"""Folder-level jobs built from the layers below: ``convert`` (checkpoint folder -> converted folder, atomic) and
``hub`` (model card + upload). The CLI, recipes and notebooks call these."""
