// The edit image and its mask: painted at display resolution, exported once at the image's own
// size in OpenAI's convention (transparent = edit, opaque = keep).
import { $ } from "./dom.js";

const DISPLAY_MAX = 480;

export class MaskEditor {
  constructor() {
    this.image = null; // { blob, bitmap, width, height }
    this.view = $("edit-image");
    this.mask = $("edit-mask");
    this.box = $("canvas-box");
    this.undoStack = [];
    this.painted = false;
    this.erasing = false;
    this.size = $("brush-size");
    this.bind();
  }

  bind() {
    $("edit-file").addEventListener("change", (e) => e.target.files[0] && this.load(e.target.files[0]));
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault(); drop.classList.remove("over");
      const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/"));
      if (file) this.load(file);
    });
    document.addEventListener("paste", (e) => {
      const item = [...(e.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
      if (item) this.load(item.getAsFile());
    });
    $("brush").addEventListener("click", () => this.tool(false));
    $("eraser").addEventListener("click", () => this.tool(true));
    $("undo").addEventListener("click", () => this.undo());
    $("clear-mask").addEventListener("click", () => this.clearMask());
    $("remove-image").addEventListener("click", () => this.remove());
    let drawing = false;
    const point = (e) => { const r = this.mask.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
    this.mask.addEventListener("pointerdown", (e) => {
      drawing = true; this.mask.setPointerCapture(e.pointerId);
      this.undoStack.push(this.ctx().getImageData(0, 0, this.mask.width, this.mask.height));
      this.stroke(...point(e), ...point(e));
      this.last = point(e);
    });
    this.mask.addEventListener("pointermove", (e) => {
      if (!drawing) return;
      const next = point(e);
      this.stroke(...this.last, ...next);
      this.last = next;
    });
    const stop = () => { drawing = false; };
    this.mask.addEventListener("pointerup", stop);
    this.mask.addEventListener("pointercancel", stop);
  }

  ctx() { return this.mask.getContext("2d"); }

  tool(erasing) {
    this.erasing = erasing;
    $("brush").setAttribute("aria-pressed", String(!erasing));
    $("eraser").setAttribute("aria-pressed", String(erasing));
  }

  stroke(x0, y0, x1, y1) {
    const ctx = this.ctx();
    ctx.globalCompositeOperation = this.erasing ? "destination-out" : "source-over";
    ctx.strokeStyle = "rgb(255, 0, 80)";
    ctx.lineWidth = Number(this.size.value);
    ctx.lineCap = "round";
    ctx.beginPath(); ctx.moveTo(x0, y0); ctx.lineTo(x1, y1); ctx.stroke();
    this.painted = true;
  }

  undo() {
    const previous = this.undoStack.pop();
    if (previous) this.ctx().putImageData(previous, 0, 0);
  }

  clearMask() {
    this.undoStack = [];
    this.ctx().clearRect(0, 0, this.mask.width, this.mask.height);
    this.painted = false;
  }

  async load(blob) {
    const bitmap = await createImageBitmap(blob);
    const scale = Math.min(1, DISPLAY_MAX / Math.max(bitmap.width, bitmap.height));
    const w = Math.round(bitmap.width * scale), h = Math.round(bitmap.height * scale);
    for (const canvas of [this.view, this.mask]) { canvas.width = w; canvas.height = h; }
    this.view.getContext("2d").drawImage(bitmap, 0, 0, w, h);
    this.image = { blob, bitmap, width: bitmap.width, height: bitmap.height };
    this.clearMask();
    this.box.hidden = false;
  }

  remove() {
    this.image = null;
    this.box.hidden = true;
    $("edit-file").value = "";
  }

  // The mask at the image's size: opaque black everywhere, transparent where painted; null if unpainted.
  async exportMask() {
    if (!this.image || !this.hasPaint()) return null;
    const out = new OffscreenCanvas(this.image.width, this.image.height);
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.globalCompositeOperation = "destination-out";
    ctx.drawImage(this.mask, 0, 0, out.width, out.height);
    return await out.convertToBlob({ type: "image/png" });
  }

  hasPaint() {
    const data = this.ctx().getImageData(0, 0, this.mask.width, this.mask.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i]) return true;
    return false;
  }
}

export async function dataUri(blob) {
  return await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
