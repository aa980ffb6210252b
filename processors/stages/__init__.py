"""The five stages. Each is a class holding its dependencies, with one handler method
(a :class:`processors.stage.Stage`); ``processors.pipeline.STAGES`` names them, with
their input events and factories."""
