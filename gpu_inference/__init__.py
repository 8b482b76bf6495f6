"""GPU workers, the diffusers runner, the local artifact store and post-processing.

Only ``gpu_inference.pipeline`` imports torch and diffusers, so the other modules load fast in
processes without the ``gpu`` extra.
"""
