"""The example graphical model (refine → class polygons) loads from its .model3 file and runs headless."""

from __future__ import annotations

from pathlib import Path

import pytest
from qgis.core import QgsProcessingFeedback, QgsProcessingModelAlgorithm, QgsVectorLayer

MODEL_FILE = Path(__file__).resolve().parents[2] / "resources" / "models" / "refine_and_polygonize.model3"
SMALL = "320100,320164,2789836,2789900 [EPSG:32640]"


@pytest.fixture
def model(idgbr_provider) -> QgsProcessingModelAlgorithm:
    model = QgsProcessingModelAlgorithm()
    assert model.fromFile(str(MODEL_FILE)), f"cannot read {MODEL_FILE}"
    return model


def test_model_loads_and_validates(model):
    ok, problems = model.validate()
    assert ok, problems
    assert model.displayName() == "IDGBR refine and polygonize"
    assert sorted(c.algorithmId() for c in model.childAlgorithms().values()) == ["idgbr:refine", "native:dissolve"]
    names = [p.name() for p in model.parameterDefinitions()]
    assert {"INPUT", "EXTENT", "COARSE", "STEPS"} <= set(names)
    assert model.shortHelpString()


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("idgbr_backend")
def test_model_runs_headless(model, sample_raster, tmp_path):
    import processing

    raster_out = model.outputDefinition("idgbr_refine:Refined classes")
    polygons_out = model.outputDefinition("dissolve_by_class:Class polygons")
    assert raster_out is not None and polygons_out is not None
    refined, polygons = tmp_path / "refined.tif", tmp_path / "classes.gpkg"
    result = processing.run(model, {"INPUT": str(sample_raster), "EXTENT": SMALL, "STEPS": 1,
                                    "idgbr_refine:Refined classes": str(refined),
                                    "dissolve_by_class:Class polygons": str(polygons)},
                            feedback=QgsProcessingFeedback())
    assert refined.is_file()
    layer = QgsVectorLayer(result["dissolve_by_class:Class polygons"], "classes", "ogr")
    assert layer.isValid()
    rows = [(f["class_id"], f["class_name"]) for f in layer.getFeatures()]
    # Dissolved by class: one (multi)polygon per class present, each named.
    assert rows and len(rows) == len({class_id for class_id, _ in rows})
    assert all(isinstance(name, str) and name for _, name in rows)
    assert Path(result["idgbr_refine:Refined classes"]) == refined
