"""The workflows above every layer: the stage runner, the pipeline and the demo."""
