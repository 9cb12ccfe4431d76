"""fastadam.torch under the training loops of Hugging Face's Trainer and Lightning, where
installed (neither is a test requirement): the loss curve of a small model follows the same
loop with torch.optim.AdamW (foreach=False)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastadam  # noqa: E402
import fastadam.torch as ft  # noqa: E402

if fastadam._backends.available()["cython"]:
    pytest.skip("the compiled kernel is not built", allow_module_level=True)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def test_hugging_face_trainer_runs_fastadam_as_torch_adamw(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer's own requirement on torch
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 97, (16, 16), generator=g)]
    losses = {}
    for name, make in (("torch", lambda p: torch.optim.AdamW(p, lr=3e-3, foreach=False)),
                       ("fastadam", lambda p: ft.AdamW(p, lr=3e-3))):
        model = tiny_gpt2()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=12, per_device_train_batch_size=4,
            logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
            data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       optimizers=(make(model.parameters()), None))
        trainer.train()
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["fastadam"]) == 12
    np.testing.assert_allclose(losses["fastadam"], losses["torch"], rtol=1e-4)
    assert losses["fastadam"][-1] < losses["fastadam"][0]


def test_lightning_trainer_runs_fastadam_as_torch_adamw():
    lightning = pytest.importorskip("lightning")
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g)

    class Module(lightning.LightningModule):
        def __init__(self, make):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
            self.make, self.losses = make, []

        def training_step(self, batch, _):
            loss = torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return self.make(self.parameters())

    losses = {}
    for name, make in (("torch", lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False)),
                       ("fastadam", lambda p: ft.AdamW(p, lr=1e-2))):
        module = Module(make)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)
        trainer = lightning.Trainer(max_epochs=3, accelerator="cpu", logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False)
        trainer.fit(module, loader)
        losses[name] = module.losses
    assert len(losses["fastadam"]) == 12
    np.testing.assert_allclose(losses["fastadam"], losses["torch"], rtol=1e-4)
