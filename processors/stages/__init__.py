"""The four stages. Each is a class holding its dependencies, with one handler method;
:mod:`processors.pipeline` wires them to workers."""
