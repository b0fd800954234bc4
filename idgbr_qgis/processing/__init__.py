"""The IDGBR Processing provider and its algorithms (toolbox, modeler, batch mode, qgis_process)."""
