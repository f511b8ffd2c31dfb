"""Training of fewstep's own tiny text-to-image model, shapes-turbo, with the recipe the large
models use: a CLIP-style tokenizer and text encoder (trained contrastively, then frozen), a KL
autoencoder, a cross-attention UNet trained as a latent DDPM with classifier-free guidance and
EMA (the teacher), and adversarial diffusion distillation of it to 1-4 steps (the student).

Data is drawn on the fly by `fewstep.shapes`. One command runs it all (`fewstep train all --out
DIR`, or `recipe.run_all`); each stage is a module here (tokenizer, clip, vae, teacher, distill),
sharing `common` (seeding, EMA, data stream) and `loop` (checkpoints, logs); `export` writes the
diffusers-layout folders that `fewstep.load` and diffusers both read. Nothing here is imported by
the inference side of fewstep, and the model files hold no training code.
"""
