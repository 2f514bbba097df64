'use strict';
// The avatar console: plain JS, no build step. Every /api call carries the token from sessionStorage
// as "Authorization: Bearer"; media (previews, MP4s) are fetched with it and shown as blob URLs.
const $ = (id) => document.getElementById(id);
const S = { avatar: null, job: null, jobTimer: null, live: null };
// what the live session measured, read by the browser test (tests/test_web.py)
window.avatarLive = { frames: 0, audioTracks: 0, videoTracks: 0, firstFrameMs: null, framesDecoded: 0, server: null, state: 'idle',
                      lookahead: null };

function token() { return sessionStorage.getItem('avatarToken') || ''; }

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {}, { Authorization: 'Bearer ' + token() });
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  if (!r.ok) {
    let msg = 'HTTP ' + r.status;
    try { msg += ': ' + ((await r.json()).error || ''); } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

function show(el, text, isError) { el.textContent = text; el.classList.toggle('error', !!isError); }

// ---- token, server info, avatars ---------------------------------------------------------------
$('token-form').addEventListener('submit', (e) => {
  e.preventDefault();
  sessionStorage.setItem('avatarToken', $('token').value.trim());
  $('token').value = '';
  loadAll();
});

async function loadAll() {
  if (!token()) { show($('token-status'), 'enter a token'); return; }
  try {
    const info = await (await api('/api/info')).json();
    show($('token-status'), 'token ok');
    $('server-info').textContent = `device ${info.device}, ${info.fps} fps, audio up to ${info.max_audio_s} s`;
    $('cpu-note').textContent = info.device === 'cpu'
      ? 'This server renders on the CPU: the video runs at whatever frame rate the CPU renders (see "render fps"), ' +
        'usually well under 25 fps, and you hear the audio in 40 ms pieces, each with its frame.'
      : `Rendering on ${info.device}.`;
    const sel = $('onboard-preset');
    sel.innerHTML = '';
    for (const p of info.presets) { const o = document.createElement('option'); o.textContent = p; sel.appendChild(o); }
    sel.value = info.presets.includes('cpu-small') ? 'cpu-small' : info.presets[0];
    await loadAvatars();
  } catch (err) { show($('token-status'), err.message, true); }
}

async function loadAvatars() {
  const list = (await (await api('/api/avatars')).json()).avatars;
  const box = $('avatars');
  box.innerHTML = '';
  if (!list.length) box.textContent = 'No avatars yet: onboard one below.';
  for (const a of list) {
    const card = document.createElement('div');
    card.className = 'card';
    card.dataset.name = a.name;
    const img = document.createElement('img');
    img.alt = a.name;
    card.appendChild(img);
    const label = document.createElement('div');
    label.textContent = a.name;
    card.appendChild(label);
    const small = document.createElement('small');
    small.textContent = `${a.size} px · ${a.preset || ''}`;
    card.appendChild(small);
    card.addEventListener('click', () => select(a.name));
    box.appendChild(card);
    api(`/api/avatars/${encodeURIComponent(a.name)}/preview.png`)
      .then((r) => r.blob()).then((b) => { img.src = URL.createObjectURL(b); })
      .catch((err) => { img.title = err.message; });
  }
  if (list.length && !list.some((a) => a.name === S.avatar)) select(list[0].name);
}

function select(name) {
  S.avatar = name;
  for (const c of document.querySelectorAll('.card')) c.classList.toggle('selected', c.dataset.name === name);
}
$('refresh').addEventListener('click', () => loadAvatars().catch((e) => show($('server-info'), e.message, true)));

// ---- render an audio file -----------------------------------------------------------------------
$('render-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const st = $('render-status');
  if (!S.avatar) { show(st, 'select an avatar first', true); return; }
  const fd = new FormData();
  fd.append('avatar', S.avatar);
  fd.append('options', JSON.stringify({ still: $('render-still').checked, emotion: $('render-emotion').value }));
  fd.append('audio', $('render-audio').files[0]);
  show(st, `rendering with ${S.avatar}...`);
  const t0 = performance.now();
  try {
    const r = await api('/api/render', { method: 'POST', body: fd });
    const blob = await r.blob();
    const v = $('render-video');
    v.src = URL.createObjectURL(blob);
    show(st, `${r.headers.get('X-Frames')} frames, rendered at ${r.headers.get('X-Render-Fps')} fps ` +
             `(${((performance.now() - t0) / 1000).toFixed(1)} s in all)`);
    v.play().catch(() => { /* autoplay refused: the controls remain */ });
  } catch (err) { show(st, err.message, true); }
});

// ---- onboarding ---------------------------------------------------------------------------------
$('onboard-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const st = $('onboard-status');
  const fd = new FormData();
  fd.append('name', $('onboard-name').value);
  fd.append('preset', $('onboard-preset').value);
  fd.append('overwrite', $('onboard-overwrite').checked ? '1' : '0');
  fd.append('video', $('onboard-video').files[0]);
  show(st, 'uploading...');
  try {
    S.job = await (await api('/api/onboard', { method: 'POST', body: fd })).json();
    $('onboard-cancel').disabled = false;
    showJob(S.job);
    clearInterval(S.jobTimer);
    S.jobTimer = setInterval(pollJob, 1000);
  } catch (err) { show(st, err.message, true); }
});

function showJob(j) {
  $('onboard-progress').value = j.progress || 0;
  const pos = j.state === 'QUEUED' && j.queue_position ? ` (queue position ${j.queue_position})` : '';
  const pct = j.state === 'RUNNING' ? ` ${Math.round(100 * (j.progress || 0))}%` : '';
  show($('onboard-status'), `${j.avatar}: ${j.state}${pos} ${j.stage || ''}${pct} ${j.message || ''} ${j.error || ''}`,
       j.state === 'FAILED');
}

async function pollJob() {
  if (!S.job) return;
  try {
    const j = await (await api(`/api/jobs/${S.job.job_id}`)).json();
    showJob(j);
    if (['SUCCEEDED', 'FAILED', 'CANCELLED'].includes(j.state)) {
      clearInterval(S.jobTimer);
      $('onboard-cancel').disabled = true;
      if (j.state === 'SUCCEEDED') loadAvatars();
    }
  } catch (err) { show($('onboard-status'), err.message, true); }
}

$('onboard-cancel').addEventListener('click', async () => {
  if (!S.job) return;
  try { showJob(await (await api(`/api/jobs/${S.job.job_id}/cancel`, { method: 'POST' })).json()); }
  catch (err) { show($('onboard-status'), err.message, true); }
});

// ---- live WebRTC session --------------------------------------------------------------------------
async function liveAudio() {
  const src = document.querySelector('input[name=live-src]:checked').value;
  if (src === 'mic') {
    return { stream: await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true } }) };
  }
  const file = $('live-file').files[0];
  if (!file) throw new Error('pick an audio file');
  const ctx = new AudioContext();
  const node = ctx.createBufferSource();
  node.buffer = await ctx.decodeAudioData(await file.arrayBuffer());
  const dest = ctx.createMediaStreamDestination();
  node.connect(dest);  // to the server only: you hear it back from the avatar
  node.start();
  return { stream: dest.stream, ctx };
}

function setLiveState(s) { window.avatarLive.state = s; $('live-state').textContent = s; }

// latency presets fill block / NeRF look-ahead; editing either makes it "custom". Blank = the server's default.
$('live-latency').addEventListener('change', () => {
  const v = $('live-latency').value;
  if (v === 'custom') return;
  const [block, nerfRight] = v ? v.split(',') : ['', ''];
  $('live-block').value = block || '';
  $('live-nerf-right').value = nerfRight || '';
});
for (const id of ['live-block', 'live-nerf-right']) {
  $(id).addEventListener('input', () => { $('live-latency').value = 'custom'; });
}

function liveLatency() {
  const num = (el) => (el.value.trim() === '' ? null : Number(el.value));
  return { block: num($('live-block')), nerf_right: num($('live-nerf-right')) };
}

async function liveStart() {
  if (!S.avatar) { setLiveState('select an avatar first'); return; }
  $('live-start').disabled = true;
  const L = window.avatarLive;
  Object.assign(L, { frames: 0, audioTracks: 0, videoTracks: 0, firstFrameMs: null, framesDecoded: 0, server: null,
                     lookahead: null });
  $('live-lookahead').textContent = '-';
  const live = { pc: new RTCPeerConnection(), times: [] };
  S.live = live;
  try {
    setLiveState('starting audio');
    const { stream, ctx } = await liveAudio();
    live.input = stream;
    live.ctx = ctx;
    const pc = live.pc;
    for (const t of stream.getAudioTracks()) pc.addTrack(t, stream);
    pc.addTransceiver('video', { direction: 'recvonly' });
    const video = $('live-video');
    pc.ontrack = (e) => {
      if (e.track.kind === 'audio') L.audioTracks += 1; else L.videoTracks += 1;
      $('live-audio').textContent = L.audioTracks;
      video.srcObject = e.streams[0] || new MediaStream([e.track]);
      video.play().catch(() => { /* needs a click on the page */ });
    };
    pc.onconnectionstatechange = () => {
      setLiveState(pc.connectionState);
      if (pc.connectionState === 'connected') live.connectedAt = performance.now();
    };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {  // non-trickle: send the offer with its candidates
      if (pc.iceGatheringState === 'complete') resolve();
      pc.addEventListener('icegatheringstatechange', () => { if (pc.iceGatheringState === 'complete') resolve(); });
      setTimeout(resolve, 3000);
    });
    setLiveState('negotiating');
    const answer = await (await api('/api/webrtc/offer', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(Object.assign({ avatar: S.avatar, sdp: pc.localDescription.sdp, type: 'offer', options: {} },
                                          liveLatency())),
    })).json();
    live.session = answer.session;
    L.lookahead = answer.lookahead_s;
    $('live-lookahead').textContent =
      `${answer.lookahead_s.toFixed(2)} s (block ${answer.block}, NeRF look-ahead ${answer.nerf_right})`;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    $('live-stop').disabled = false;
    $('live-interrupt').disabled = false;
    const onFrame = (now) => {
      if (S.live !== live) return;
      L.frames += 1;
      if (L.firstFrameMs === null && live.connectedAt) L.firstFrameMs = now - live.connectedAt;
      live.times.push(now);
      while (live.times.length && now - live.times[0] > 2000) live.times.shift();
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
    live.timer = setInterval(() => liveStats(live), 1000);
  } catch (err) {
    setLiveState('error: ' + err.message);
    await liveStop();
  }
}

async function liveStats(live) {
  const L = window.avatarLive;
  $('live-frames').textContent = L.frames;
  const now = performance.now();
  while (live.times.length && now - live.times[0] > 2000) live.times.shift();
  $('live-fps').textContent = live.connectedAt && now - live.connectedAt > 2000 ? (live.times.length / 2).toFixed(1) : '-';
  $('live-first').textContent = L.firstFrameMs === null ? '-' : `${(L.firstFrameMs / 1000).toFixed(2)} s`;
  try {
    (await live.pc.getStats()).forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') L.framesDecoded = r.framesDecoded || 0;
    });
    if (live.session) {
      const s = await (await api(`/api/webrtc/${live.session}/stats`)).json();
      L.server = s;
      $('live-render-fps').textContent = s.render_fps !== undefined ? `${s.render_fps} (${s.size} px)` : '-';
      const st = s.stages;
      $('live-stages').textContent = Object.keys(st).filter((k) => st[k] !== null)
        .map((k) => `${k} ${st[k].toFixed(3)} s`).join(' · ') + ` (lookahead ${s.lookahead_s} s)`;
      $('live-dropped').textContent = `${s.audio_dropped_s} s of ${s.audio_in_s} s`;
      if (s.error) setLiveState('error: ' + s.error);
    }
  } catch (err) { /* the session ended */ }
}

async function liveStop() {
  const live = S.live;
  S.live = null;
  $('live-start').disabled = false;
  $('live-stop').disabled = true;
  $('live-interrupt').disabled = true;
  if (!live) return;
  clearInterval(live.timer);
  if (live.session) api(`/api/webrtc/${live.session}/close`, { method: 'POST' }).catch(() => {});
  if (live.input) live.input.getTracks().forEach((t) => t.stop());
  if (live.ctx) live.ctx.close();
  live.pc.close();
  if (!window.avatarLive.state.startsWith('error')) setLiveState('stopped');
}

$('live-start').addEventListener('click', liveStart);
$('live-stop').addEventListener('click', liveStop);
$('live-interrupt').addEventListener('click', () => {
  if (S.live && S.live.session) api(`/api/webrtc/${S.live.session}/interrupt`, { method: 'POST' }).catch(() => {});
});

loadAll();
