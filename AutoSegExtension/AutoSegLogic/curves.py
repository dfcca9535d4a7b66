"""Training curves in the scene: a table node filled from ``epoch`` events, shown by a plot chart.

One row per finished epoch: epoch, training loss, validation loss, mean pseudo-Dice, its moving
average (what picks the best checkpoint), then one pseudo-Dice column per structure. The chart
draws the losses and the two pseudo-Dice curves against the epoch. The nodes are ordinary
scene nodes, so the curves are saved with the scene and can be opened in the Tables and
Plots modules.
"""

from __future__ import annotations

import math

import vtk

COLUMNS = ("epoch", "train_loss", "val_loss", "mean_pseudo_dice", "ema_pseudo_dice")
_SERIES = {  # column -> (legend, colour)
    "train_loss": ("training loss", (0.20, 0.40, 0.80)),
    "val_loss": ("validation loss", (0.95, 0.55, 0.10)),
    "mean_pseudo_dice": ("pseudo-Dice", (0.20, 0.65, 0.30)),
    "ema_pseudo_dice": ("pseudo-Dice (moving average)", (0.10, 0.35, 0.15)),
}


class TrainingCurves:
    """Table, series and chart nodes for one training run, named after ``name``."""

    def __init__(self, scene, name: str = "AutoSeg training"):
        self.scene = scene
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} table")
        for column in COLUMNS:
            self._add_column(column)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
        self.chart.SetTitle(name)
        self.chart.SetXAxisTitle("epoch")
        self.chart.SetYAxisTitle("loss / pseudo-Dice")
        self.series = {}
        for column, (legend, colour) in _SERIES.items():
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {legend}")
            series.SetAndObserveTableNodeID(self.table.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetMarkerStyle(series.MarkerStyleCircle)
            series.SetColor(*colour)
            self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
            self.series[column] = series

    @property
    def rows(self) -> int:
        return self.table.GetTable().GetNumberOfRows()

    def add_epoch(self, event: dict) -> None:
        """Append one ``epoch`` event (see docs/events.md) as a row."""
        per_class = event.get("pseudo_dice") or {}
        for name in per_class:
            if self.table.GetTable().GetColumnByName(f"dice {name}") is None:
                self._add_column(f"dice {name}")
        values = {"epoch": event.get("done", (event.get("epoch") or 0) + 1),
                  **{c: event.get(c) for c in COLUMNS[1:]},
                  **{f"dice {n}": v for n, v in per_class.items()}}
        table = self.table.GetTable()
        # A resumed run repeats the epochs after its checkpoint: drop their earlier values.
        epochs = self.column("epoch")
        while epochs and epochs[-1] >= values["epoch"]:
            table.RemoveRow(len(epochs) - 1)
            epochs.pop()
        row = table.InsertNextBlankRow()
        for c in range(table.GetNumberOfColumns()):
            value = values.get(table.GetColumnName(c))
            table.SetValue(row, c, vtk.vtkVariant(math.nan if value is None else float(value)))
        table.Modified()
        self.table.Modified()

    def add_epochs(self, events) -> None:
        for event in events:
            if event.get("event", "epoch") == "epoch":
                self.add_epoch(event)

    def clear(self) -> None:
        self.table.GetTable().SetNumberOfRows(0)
        self.table.Modified()

    def column(self, name: str) -> list[float]:
        array = self.table.GetTable().GetColumnByName(name)
        return [array.GetValue(i) for i in range(array.GetNumberOfTuples())]

    def _add_column(self, name: str) -> None:
        array = vtk.vtkDoubleArray()
        array.SetName(name)
        array.SetNumberOfTuples(self.rows if self.table.GetTable().GetNumberOfColumns() else 0)
        array.Fill(math.nan)
        self.table.GetTable().AddColumn(array)
