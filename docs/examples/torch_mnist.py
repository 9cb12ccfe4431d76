"""Train the MNIST MLP (784-256-128-10) in PyTorch with fastadam.torch.AdamW, on the bundled data.

    pip install -e ".[torch]" && python docs/examples/torch_mnist.py [--epochs 3]
"""
import argparse
import time

import torch

import fastadam.torch
from fastadam.mnist import data

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()

x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in data.load_dataset(data.locate()))
x_train, x_test = x_train.reshape(len(x_train), -1).float(), x_test.reshape(len(x_test), -1).float()
if x_train.max() > 1:  # scale pixels to [0, 1]
    x_train, x_test = x_train / 255, x_test / 255
y_train, y_test = y_train.long(), y_test.long()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                            torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
opt = fastadam.torch.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)

for epoch in range(args.epochs):
    started = time.perf_counter()
    for batch in torch.randperm(len(x_train)).split(128):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        loss.backward()
        opt.step()
    schedule.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"epoch {epoch + 1}: test accuracy {100 * accuracy:.2f}%  "
          f"({time.perf_counter() - started:.1f} s)")
