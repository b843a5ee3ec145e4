"""Evaluation of mmgen models on the shapes world, as a library; the commands are in eval/.

- quick.py: the small evaluation run during and at the end of training (learning curves, model card);
- shapeeval.py: GenEval's six text-to-image tasks, judged exactly from the rendered scene;
- shapefd.py: ShapeFD / ShapeKID distribution distances (feature net weights beside it);
- understanding.py: captioning and VQA; interleaved.py: multi-turn draw / edit / ask programs;
- judge.py: re-judging a finished evaluation from its files; report.py: its tables and plots;
- metrics2d.py: distances between 2-D point clouds (the 2-D benchmark).
"""
