"""What several training tests share: prompts with the tokenizer's hard cases, and an ADD without a Stage."""

import torch

PROMPTS = ["a large red circle at the top left", "A small blue square and a Green Triangle on a white background.",
           "an orange triangle!! 42 üñî <|endoftext|> x", ""]


def bare_add(teacher: torch.nn.Module, student: torch.nn.Module, device: torch.device):
    """An ADD on `device` without a Stage: the little of a Stage and its Accelerator that ADD uses."""
    from fewstep.train.distill import ADD, Discriminator, feature_channels, feature_side

    class Accel:
        def prepare(self, *objects):
            return [o.to(device) if isinstance(o, torch.nn.Module) else o for o in objects]

        def unwrap_model(self, model):
            return model

    Accel.device = device

    class FakeStage:
        hyper, accel = type("H", (), {"lr": 1e-4})(), Accel()

        def track(self, *objects):
            pass

    disc = Discriminator(feature_channels(teacher), 32, feature_side(teacher))
    return ADD(FakeStage(), teacher, student, disc, torch.zeros(1, 32, 32), 1e-4)
