// Input-to-photon while a viewer is in use, on either path: from a key press
// that follows a pause to the first picture shown after it whose thumbnail
// differs from the picture at the press. Keys that change nothing on screen
// give no sample (given up after a second). The path calls pressed() once the
// key has gone out and shown(at) after each new picture; each sample goes to
// onSample(ms, median of the recent ones).

// Only a press after a pause: in fast typing the previous key's echo would be
// taken for this one's.
const QUIET_MS = 300;
const GIVE_UP_MS = 1000;
const KEEP = 50;
// One typed character moves a few thumbnail pixels by 10–40 levels; an
// unchanged picture gives the same pixels.
const CHANGED_LEVELS = 8;

export class InputLatency {
  /** `source()`: the element showing the picture (a video or a canvas), or
   *  null while there is none. */
  constructor(source, onSample) {
    this.source = source;
    this.onSample = onSample;
    this.pending = null;
    this.samples = [];
    this.presses = 0;
    this.unseen = 0;
    this.frames = 0;
    this.lastKeyAt = 0;
    this.thumb = null;
  }

  /** A key went down at `at` (performance.now()) and has been sent. */
  pressed(at) {
    const quiet = at - this.lastKeyAt > QUIET_MS;
    this.lastKeyAt = at;
    if (!quiet || this.pending) return;
    const before = this.thumbnail();
    if (!before) return;
    this.presses++;
    this.pending = { at, before };
  }

  /** A new picture is in the page since `at` (same clock). */
  shown(at) {
    const p = this.pending;
    if (!p || at <= p.at) return;
    this.frames++;
    if (at - p.at > GIVE_UP_MS) {
      this.pending = null;
      this.unseen++;
      return;
    }
    const after = this.thumbnail();
    if (!after) return;
    let changed = false;
    for (let i = 0; i < after.length && !changed; i++) changed = Math.abs(after[i] - p.before[i]) > CHANGED_LEVELS;
    if (!changed) return;
    this.pending = null;
    const ms = Math.round((at - p.at) * 10) / 10;
    this.samples.push(ms);
    if (this.samples.length > KEEP) this.samples.shift();
    const sorted = [...this.samples].sort((a, b) => a - b);
    this.onSample(ms, sorted[Math.floor(sorted.length / 2)]);
  }

  // A 160x100 thumbnail of the picture now, or null without one: fine enough
  // that one typed character changes a pixel of it clearly.
  thumbnail() {
    const el = this.source();
    if (!el) return null;
    if (!this.thumb) {
      const c = document.createElement('canvas');
      c.width = 160;
      c.height = 100;
      this.thumb = c.getContext('2d', { willReadFrequently: true });
      // Average whole areas when shrinking, so a small change still shows.
      this.thumb.imageSmoothingEnabled = true;
      this.thumb.imageSmoothingQuality = 'high';
    }
    this.thumb.drawImage(el, 0, 0, 160, 100);
    return this.thumb.getImageData(0, 0, 160, 100).data;
  }
}
